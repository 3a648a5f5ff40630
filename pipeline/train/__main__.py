"""``python -m pipeline.train ...`` (and ``torchrun -m pipeline.train``): the train command alone."""

import sys

from pipeline.train.cli import get_args_parser, main

sys.exit(main(get_args_parser().parse_args()))
