"""ftkit.inspect: Axolotl's debug text format (exact), colours, and the HTML view."""
import io
import ftkit_test_tokenizers as T
from ftkit.prompts.chat_template import build
from ftkit.inspect import debug_text, debug_summary, print_examples, html_tokens, show, supports_color, report_html

CONV = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "How can I help you?"},
                     {"role": "user", "content": "Can you add 3+5?"}, {"role": "assistant", "content": "The answer is 8."}]}

def test_axolotl_doc_format_exact():
    "The documented pattern: header and user turn masked, the \\n after <|im_end|> starts the next line masked."
    tok = T.smollm2()
    r = build(tok, {"chat_template": "chatml"}).tokenize(CONV)[0]
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    def enc(s): return tok.encode(s, add_special_tokens=False)
    user, asst, nl = enc("user"), enc("assistant"), enc("\n")[0]
    def masked(s): return " ".join(f"{tok.decode([i])}(-100, {i})" for i in enc(s))
    def trained(s): return " ".join(f"{tok.decode([i])}({i}, {i})" for i in enc(s))
    S, E = ids["<|im_start|>"], ids["<|im_end|>"]
    head = lambda role: f"<|im_start|>(-100, {S}) {masked(role)} \n(-100, {nl})"
    want = (f"{head('user')} {masked('Hi')} <|im_end|>(-100, {E}) \n(-100, {nl}) "
            f"{head('assistant')} {trained('How can I help you?')} <|im_end|>({E}, {E}) \n(-100, {nl}) "
            f"{head('user')} {masked('Can you add 3+5?')} <|im_end|>(-100, {E}) \n(-100, {nl}) "
            f"{head('assistant')} {trained('The answer is 8.')} <|im_end|>({E}, {E}) \n(-100, {nl})")
    assert debug_text(r, tok) == want
    lines = debug_text(r, tok).split("\n")
    assert lines[1].startswith(f"(-100, {nl}) Hi(-100, ")          # as in the docs: the newline token opens the line

def test_colours_and_summary(monkeypatch):
    tok = T.smollm2()
    r = {"input_ids": [1, 2, 3], "labels": [-100, 0, 3]}
    c = debug_text(r, tok, color=True)
    assert "\x1b[31m" in c and "\x1b[33m" in c and "\x1b[32m" in c and c.count("\x1b[37m(") == 3
    assert debug_text(r, tok, text_only=True) == tok.decode([1]) + tok.decode([2]) + tok.decode([3])
    assert debug_summary(r) == "\n\n\nTotal input len: 3\nCount of labels: 2"
    monkeypatch.setenv("NO_COLOR", "1"); assert not supports_color()
    monkeypatch.delenv("NO_COLOR"); monkeypatch.setenv("FORCE_COLOR", "1"); assert supports_color(io.StringIO())
    monkeypatch.delenv("FORCE_COLOR"); assert not supports_color(io.StringIO())

def test_print_examples_random_with_replacement():
    tok = T.smollm2()
    rows = [build(tok, {"chat_template": "chatml"}).tokenize(CONV)[0]]
    buf = io.StringIO(); print_examples(rows, tok, num_examples=3, seed=1, file=buf)
    assert buf.getvalue().count("Total input len:") == 3

def test_html_view():
    tok = T.smollm2()
    s = build(tok, {"chat_template": "chatml"})
    r = s.tokenize(CONV)[0]
    h = html_tokens(r, tok, s.eot_ids)
    assert h.count(" title=") == len(r["input_ids"])
    assert 'class="tr bd" title="id 2020 | label 2020 | &#x27;How&#x27;"' in h        # trained, boundary, hover
    assert "class=\"ms sp eos\"" in h and "class=\"tr sp eos\"" in h                   # masked and trained <|im_end|>
    assert "↵" in h and "·can" in h                                                    # whitespace visible
    out = show([r], tok, rows=[0])._repr_html_()
    assert "<style>" in out and "row 0" in out
    class R:
        def __str__(self): return "data: 1 rows\nWARNING: x"
    assert 'color:#c00">WARNING: x' in report_html(R())
