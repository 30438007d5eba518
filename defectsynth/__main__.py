import sys

from defectsynth.cli import main

sys.exit(main())
