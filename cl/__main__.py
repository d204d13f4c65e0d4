from cl.cli import main

raise SystemExit(main())
