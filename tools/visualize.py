"""Draw which patches EViT keeps in real images, block by block. See --help."""

import argparse

from evit_patch.commands import visualize

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=visualize.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    visualize.add_arguments(parser)
    visualize.run(parser.parse_args())
