"""``python -m clipfusion`` is the ``clipfusion`` command."""

from clipfusion.cli import main

raise SystemExit(main())
