"""`python -m service serve ...` is the same as the `neuroserve` console script."""

from service.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
