"""First-order MAML (FOMAML) on Omniglot's minimal splits.

Finn et al. (2017, section 5.2): the meta-gradient ignores the second derivatives of the inner
loop, ``dθ_K/dθ_0 ≈ I``, so the query gradient at the adapted weights is the meta-gradient. In
mlopt this is the lower problem's ``Config(type="first_order")``; the rest is
``examples/maml_omniglot.py`` (same options, ``--path`` included).

Run::

    python examples/fomaml_omniglot.py --ways 5 --minutes 8 --out results/fomaml_5way.json
    python examples/fomaml_omniglot.py --smoke
"""

from __future__ import annotations

try:
    import maml_omniglot
except ImportError:
    from examples import maml_omniglot


def main(argv: list[str] | None = None) -> dict:
    return maml_omniglot.main(["--first-order", *(argv or [])], name="fomaml")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
