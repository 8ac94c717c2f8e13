from tractor_session.cli import main

raise SystemExit(main())
