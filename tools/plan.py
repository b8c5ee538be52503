"""Budget -> EViT plan (analytic or calibrated on images; same-cost higher resolution). See --help."""

import argparse

from evit_patch.commands import plan

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=plan.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_arguments(parser)
    plan.run(parser.parse_args())
