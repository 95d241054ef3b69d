"""``kvsim fit-methods``: fit the measured method implementations on the seed paper's LMDeploy data (the
work: :mod:`kvsim.cost.method_fit`)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("fit-methods", help="fit measured method implementations on the seed paper's LMDeploy data")
    p.add_argument("--data", default=None, help="the seed paper's throughput.csv (default: ../shared/reference/seed-lmdeploy/throughput.csv)")
    p.add_argument("--out", default="out/method-fit", help="folder for method_terms.yaml, errors.csv/.md and plots")
    p.add_argument("--no-plot", action="store_true", help="skip the ratio plots")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from kvsim.cost.method_fit import default_data_path, error_table_md, run, write_outputs

    data = args.data or str(default_data_path())
    result = run(data, progress=not args.quiet)
    write_outputs(result, Path(args.out), data_path="../shared/reference/seed-lmdeploy/throughput.csv"
                  if args.data is None else args.data, plot=not args.no_plot)
    print(error_table_md(result))
    print(f"wrote {args.out}/method_terms.yaml, errors.csv, errors.md" + ("" if args.no_plot else ", ratios_*.png"))
    print("the committed terms live in kvsim/methods/data/method_terms.yaml (results/method-costs/regenerate.sh)")
    return 0
