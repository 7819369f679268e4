import sys

from etappe.cli import main

sys.exit(main())
