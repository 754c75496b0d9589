from zoengine.cli import main

raise SystemExit(main())
