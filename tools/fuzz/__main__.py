"""Fuzz fabric's parsers of untrusted bytes for a bounded time, with atheris (coverage-guided).

    python -m tools.fuzz                      # every target, 60 s in all
    python -m tools.fuzz --seconds 600 frames gossip
    python -m tools.fuzz --reproduce link crash-1234abcd   # run one input again, with its traceback

Each target runs in its own process (atheris ends the process it fuzzes in),
for an equal share of --seconds, starting from valid seed inputs. Exit
status 0: nothing found; 1: a target raised something its parser may not
(the input is saved under --artifacts, and the command to reproduce it is
printed); 2: bad command line. Anything found belongs in
tests/unit/test_fuzz.py as a regression test.

atheris comes from PyPI (`pip install atheris`; wheels for CPython 3.8-3.11
on x86-64 Linux). Without it, --engine random runs the same targets on
random mutations of the seeds: much weaker, but bounded in time the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(target: str, seconds: float, artifacts: Path) -> int:
    """Fuzz one target with atheris in this process; libFuzzer exits the process when done."""
    import atheris

    with atheris.instrument_imports(include=["fabric"]):
        from tools.fuzz import targets

    fuzz = targets.TARGETS[target]
    corpus = Path(tempfile.mkdtemp(prefix=f"fabric-fuzz-{target}-corpus-"))
    for index, seed in enumerate(targets.seed_corpus(target)):
        (corpus / f"seed-{index}").write_bytes(seed)
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        f"-max_total_time={max(1, int(seconds))}",
        f"-artifact_prefix={artifacts}/{target}-",
        "-timeout=20",  # seconds for one input: a hang is a finding too
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(argv, fuzz)
    atheris.Fuzz()
    return 0


def _random_engine(target: str, seconds: float, artifacts: Path) -> int:
    """No atheris: random byte-level mutations of the seeds, for `seconds`. Weaker, same promise."""
    from tools.fuzz import targets

    fuzz = targets.TARGETS[target]
    pool = [s for s in targets.seed_corpus(target) if s] or [b"\0"]
    rng = random.Random()
    runs, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 8)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = rng.randbytes(rng.randint(1, 16))
            elif op == 2 and data:
                del data[pos : pos + rng.randint(1, 16)]
            else:
                data[pos:pos] = data[: rng.randint(0, 64)]
        try:
            fuzz(bytes(data))
        except Exception:
            artifacts.mkdir(parents=True, exist_ok=True)
            path = artifacts / f"{target}-crash-{int(time.time())}"
            path.write_bytes(bytes(data))
            print(f"{target}: finding saved to {path}", file=sys.stderr)
            raise
        runs += 1
    print(f"{target}: {runs} inputs in {seconds:g} s, nothing found")
    return 0


def _reproduce(target: str, path: Path) -> int:
    from tools.fuzz import targets

    targets.TARGETS[target](path.read_bytes())
    print(f"{target}: {path} passes now")
    return 0


TARGET_NAMES = ("frames", "payloads", "hello", "gossip", "records", "token", "csr", "cert", "link", "http", "http-listener", "http-fast")


def main(argv: list[str] | None = None) -> int:
    # Nothing of fabric is imported before a child starts atheris: it must import it instrumented.
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="target", help=f"default: all of {', '.join(TARGET_NAMES)}")
    parser.add_argument("--seconds", type=float, default=60.0, help="time for all targets together (default 60)")
    parser.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    parser.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "fabric-fuzz-artifacts")
    parser.add_argument("--reproduce", nargs=2, metavar=("TARGET", "FILE"), help="run one saved input again")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.reproduce:
        return _reproduce(args.reproduce[0], Path(args.reproduce[1]))
    if args.child:
        run = _child if args.engine == "atheris" else _random_engine
        return run(args.child, args.seconds, args.artifacts)

    from tools.fuzz.targets import TARGETS

    assert tuple(TARGETS) == TARGET_NAMES, "keep TARGET_NAMES in step with targets.TARGETS"
    chosen = args.targets or list(TARGETS)
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    engine = args.engine
    if engine == "atheris":
        if importlib.util.find_spec("atheris") is None:
            print("atheris is not installed; `pip install atheris`, or use --engine random", file=sys.stderr)
            return 2
    share = args.seconds / len(chosen)
    found = []
    root = Path(__file__).resolve().parents[2]
    for target in chosen:
        print(f"== {target}: {share:.0f} s with {engine}", flush=True)
        command = [
            sys.executable, "-m", "tools.fuzz", "--child", target, "--seconds", str(share),
            "--engine", engine, "--artifacts", str(args.artifacts),
        ]
        # libFuzzer prints its progress on stderr; keep its last lines for the summary.
        result = subprocess.run(command, cwd=root, stderr=subprocess.PIPE, text=True, errors="replace",
                                env={**os.environ, "PYTHONPATH": str(root)})
        tail = [l for l in result.stderr.splitlines() if l.strip()]
        stats = [l for l in tail if l.startswith(("stat::number_of_executed_units", "Done "))]
        if result.returncode != 0:
            found.append(target)
            print("\n".join(tail[-40:]), file=sys.stderr)
            print(f"!! {target}: finding (exit {result.returncode}); inputs are under {args.artifacts}; "
                  f"reproduce with: python -m tools.fuzz --reproduce {target} FILE", flush=True)
        else:
            print(f"   {target}: nothing found; {' '.join(stats) or (tail[-1] if tail else '')}", flush=True)
    if found:
        print(f"findings in: {', '.join(found)}")
        return 1
    print(f"nothing found in {len(chosen)} target(s), {args.seconds:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
