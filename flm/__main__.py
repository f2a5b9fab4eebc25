from flm.cli import main

raise SystemExit(main())
