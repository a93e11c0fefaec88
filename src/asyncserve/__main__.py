import sys

from asyncserve.cli import main

sys.exit(main())
