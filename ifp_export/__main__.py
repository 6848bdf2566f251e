"""`python -m ifp_export` == the `ifp-export` console script."""

from ifp_export.cli import main

main()
