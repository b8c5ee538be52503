"""Top-1/top-5 of original and patched models, agreement and KL between them. See --help."""

import argparse

from evit_patch.commands import evaluate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=evaluate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_arguments(parser)
    evaluate.run(parser.parse_args())
