from linewarden.cli import main

raise SystemExit(main())
