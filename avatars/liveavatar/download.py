"""`python -m avatars.liveavatar.download [--root DIR]`: fetch LiveAvatar's real weights (about 57 GB).

They go to `<root>/<repo name>/` (default: $ISPA_WEIGHTS, or ./weights), resumably: a run that stops, or is
stopped, continues where it was the next time. See `avatars.liveavatar.weights.hub` for what is fetched from which
repository and `avatars.liveavatar.weights.fetch` for how. Set HF_TOKEN when a repository needs a token.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from avatars.liveavatar.loading import weights_dir
from avatars.liveavatar.weights.fetch import DownloadError, DownloadPlan, download_weights

QUIET_LOGGERS = ("httpx", "httpx2", "huggingface_hub")  # one line per HTTP request at INFO: not beside a bar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avatars.liveavatar.download", description=__doc__)
    parser.add_argument("--root", default=str(weights_dir()), help="where to put the weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    bar: list[tqdm] = []

    def show_plan(plan: DownloadPlan) -> None:
        print(
            f"{len(plan.files)} files, {plan.total_bytes / 1e9:.1f} GB; {plan.done_bytes / 1e9:.1f} GB already here"
        )
        bar.append(
            tqdm(total=plan.total_bytes, initial=plan.done_bytes, unit="B", unit_scale=True, desc="weights")
        )

    try:
        with logging_redirect_tqdm():  # a retry's warning is printed above the bar, not through it
            paths = download_weights(args.root, on_plan=show_plan, on_bytes=lambda n: bar[0].update(n))
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    finally:
        for b in bar:
            b.close()
    print(f"weights ready in {args.root} (DiT: {paths.dit_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
