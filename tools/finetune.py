"""Fine-tune a patched model by distilling its original: keep-rate warm-up, DDP, exact resume. See --help."""

import argparse
import sys

from evit_patch.commands import finetune

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=finetune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    finetune.add_arguments(parser)
    args = parser.parse_args()
    args.argv = sys.argv[1:]  # --resume DIR takes the flags not given here from DIR/args.json
    finetune.run(args)
