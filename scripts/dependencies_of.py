"""Print the requirements of installed distributions, one per line, for `pip install -r`.

    python scripts/dependencies_of.py DIST... [--without NAME...]

Only the requirements that apply here (markers evaluated, no extras) are printed, without their
markers; the ones named after --without are left out. scripts/bootstrap uses it to install a
wheel that was installed with --no-deps together with all but the dependencies it must not pull.
"""

import argparse
from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dists", nargs="+")
    parser.add_argument("--without", nargs="*", default=[])
    args = parser.parse_args()
    left_out = {canonicalize_name(name) for name in args.without}
    for dist in args.dists:
        for line in requires(dist) or []:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) in left_out:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            requirement.marker = None
            print(requirement)


if __name__ == "__main__":
    main()
