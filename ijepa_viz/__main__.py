"""`python -m ijepa_viz` is the `ijepa-viz` command."""
import sys

from ijepa_viz.cli import main

sys.exit(main())
