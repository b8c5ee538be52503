"""Fine-tune a patched model by distilling its original: keep-rate warm-up, DDP, exact resume. See --help."""

import argparse

from evit_patch.commands import finetune

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=finetune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    finetune.add_arguments(parser)
    finetune.run(parser.parse_args())
