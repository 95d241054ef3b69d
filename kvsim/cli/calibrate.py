"""``kvsim calibrate``: fit the roofline's efficiency terms per hardware (the work:
:mod:`kvsim.cost.calibrate`)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    from kvsim.cost.calibrate import CALIBRATION_YAML

    c = sub.add_parser("calibrate", help="fit the roofline's efficiency terms per hardware on the imported kernel profiles")
    c.add_argument("--profiles", nargs="*", default=None, help="profile JSON files (default: kvsim/profiles/imported/*.json)")
    c.add_argument("--out", default="results/calibration",
                   help="where to write the fitted calibration.yaml, errors (CSV, markdown) and a plot")
    c.add_argument("--yaml", default=None,
                   help="write the calibration file here instead of OUT/calibration.yaml (the one kvsim reads is "
                        f"{CALIBRATION_YAML.relative_to(CALIBRATION_YAML.parents[2])}; pass that path to replace it)")
    c.add_argument("--no-write", action="store_true", help="report only; write no calibration file")
    c.add_argument("--no-loo", action="store_true", help="skip the leave-one-out refits")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from kvsim.cost.calibrate import format_markdown, run

    res = run(args.out, None if args.yaml is None else Path(args.yaml), args.profiles, loo=not args.no_loo,
              progress=not args.quiet) if not args.no_write else _run_no_write(args)
    print(format_markdown(res))
    print(f"outputs: {args.out}/operator_errors.csv summary.csv summary.md params.csv fit.png"
          + (f"; wrote {res['yaml']}" if res.get("yaml") else ""))
    return 0


def _run_no_write(args) -> dict:
    from kvsim.cost.calibrate import run, write_outputs

    res = run(None, None, args.profiles, loo=not args.no_loo)
    write_outputs(res, Path(args.out))
    return res
