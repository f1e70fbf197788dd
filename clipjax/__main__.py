import sys

from clipjax.cli import main

sys.exit(main())
