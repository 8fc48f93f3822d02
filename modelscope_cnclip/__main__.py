import sys

from modelscope_cnclip.cli import main

sys.exit(main())
