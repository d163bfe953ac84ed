import sys

from crystallm_core.product.cli import main

sys.exit(main())
