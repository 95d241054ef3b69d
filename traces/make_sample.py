"""Regenerate traces/sample.jsonl exactly (run from the repository root):

    python traces/make_sample.py                 # writes traces/sample.jsonl
    python traces/make_sample.py --check         # exit 1 if traces/sample.jsonl differs from what it would write
    python traces/make_sample.py --refit CSV     # print the quantile tables fitted from a ShareGPT stats CSV

The lengths come from QuantileLengths with the two tables below: the 0%, 5%, ..., 100% quantiles of
the prompt and output lengths of ShareGPT (Sarathi-Serve's sharegpt_8k_filtered_stats_llama2_tokenizer.csv,
Llama-2 tokenizer), keeping only the 22,776 of 30,731 rows with prompt + output <= 4096. They were
computed with ``--refit ../shared/traces/sarathi_processed/sharegpt_8k_filtered_stats_llama2_tokenizer.csv``
and are embedded here so that the sample can be regenerated without that file. Prompt and output are
drawn independently (their log-lengths correlate at only 0.02 in the data) and pairs with
prompt + output > 4096 are redrawn.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kvsim.workload.readers import write_trace  # noqa: E402
from kvsim.workload.synthetic import LengthStats, QuantileLengths, synthetic_requests  # noqa: E402

#: 0%, 5%, ..., 100% quantiles of ShareGPT prompt lengths (rows with prompt + output <= 4096)
SHAREGPT_PROMPT_QUANTILES = [1, 23, 45, 90, 174, 319, 473, 620, 759, 906, 1063, 1236, 1423, 1624, 1847, 2106, 2350, 2634, 2944, 3287, 4062]
#: the same for output lengths
SHAREGPT_OUTPUT_QUANTILES = [2, 39, 74, 113, 162, 209, 256, 299, 336, 369, 402, 437, 475, 519, 564, 610, 661, 731, 812, 907, 1024]
MAX_TOTAL_TOKENS = 4096

NUM_REQUESTS = 300
RATE_PER_S = 5.0
SEED = 20240
OUT = REPO / "traces" / "sample.jsonl"


def sample_lengths() -> QuantileLengths:
    return QuantileLengths(SHAREGPT_PROMPT_QUANTILES, SHAREGPT_OUTPUT_QUANTILES, max_total_tokens=MAX_TOTAL_TOKENS)


def sample_requests():
    return synthetic_requests(NUM_REQUESTS, RATE_PER_S, seed=SEED, arrival="poisson", lengths=sample_lengths())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    ap.add_argument("--refit", metavar="CSV", help="print the quantile tables of a ShareGPT stats CSV and exit")
    args = ap.parse_args(argv)
    if args.refit:
        stats = LengthStats.from_csv(args.refit, max_total_tokens=MAX_TOTAL_TOKENS)
        p, o = stats.quantiles(20)
        print(f"# {len(stats)} pairs with prompt + output <= {MAX_TOTAL_TOKENS}")
        print(f"SHAREGPT_PROMPT_QUANTILES = {p}")
        print(f"SHAREGPT_OUTPUT_QUANTILES = {o}")
        return 0
    if args.check:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / "sample.jsonl"
            write_trace(sample_requests(), tmp)
            same = args.out.exists() and tmp.read_bytes() == args.out.read_bytes()
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from the generator'}")
        return 0 if same else 1
    n = write_trace(sample_requests(), args.out)
    print(f"wrote {n} requests to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
