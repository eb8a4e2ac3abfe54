"""The cases whose ftkit rows differ from Axolotl's on purpose, with the DIFFERENCES.md entry that says why.
(D1, rows that train nothing, is applied to every case by the comparison itself.)"""
DELIBERATE: dict[str, str] = {
    "ct_empty_last_turn_eos": "D4 (an empty turn trains nothing, not even the conversation's last token)",
}
