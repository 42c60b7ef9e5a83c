"""`python -m avatars.liveavatar.download [--root DIR]`: fetch LiveAvatar's real weights (about 57 GB).

They go to `<root>/<repo name>/` (default: $ISPA_WEIGHTS or ./weights), resumably; see
`avatars.liveavatar.weights.hub` for what is fetched from which repository.
"""

from __future__ import annotations

import argparse
import logging
import sys

from avatars.liveavatar.loading import weights_dir
from avatars.liveavatar.weights.errors import CheckpointError
from avatars.liveavatar.weights.hub import download_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avatars.liveavatar.download", description=__doc__)
    parser.add_argument("--root", default=str(weights_dir()), help="where to put the weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = download_weights(args.root)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"weights ready in {args.root} (DiT: {paths.dit_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
