from paradiff.cli import main

raise SystemExit(main())
