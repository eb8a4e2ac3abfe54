"""Run `preprocess` for many configs in one process: `python driver.py axolotl|ftkit RESULTS.json CFG.yml ...`.

The same code path as the `axolotl preprocess CFG` / `ftkit preprocess CFG` commands (their CLI
entry functions), without paying the import of torch and the tool once per case. Each config's
output (stdout and stderr, at the file-descriptor level) goes to `<config>.log` beside it; the exit
status of each goes to RESULTS.json. Runs under either interpreter: imports only the tool it runs."""
import json, os, sys, traceback
from pathlib import Path

def run_axolotl(cfg: str):
    from axolotl.cli.preprocess import do_cli
    do_cli(config=cfg)

def run_ftkit(cfg: str):
    from ftkit.cli import main
    rc = main(["preprocess", cfg])
    if rc: raise SystemExit(rc)

def main(tool: str, results: str, cfgs: list[str]):
    fn = {"axolotl": run_axolotl, "ftkit": run_ftkit}[tool]
    out, keep1, keep2 = {}, os.dup(1), os.dup(2)
    for cfg in cfgs:
        log = os.open(str(Path(cfg).with_suffix(".log")), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(log, 1); os.dup2(log, 2)
        try:
            fn(cfg); rc = 0
        except SystemExit as e: rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException: traceback.print_exc(); rc = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(keep1, 1); os.dup2(keep2, 2); os.close(log)
        out[cfg] = rc
        print(f"{tool}: {Path(cfg).parent.name}: exit {rc}", flush=True)
    Path(results).write_text(json.dumps(out))

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
