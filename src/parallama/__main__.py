from parallama.cli import main

raise SystemExit(main())
