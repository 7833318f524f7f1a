from actorgen.cli.main import main

raise SystemExit(main())
