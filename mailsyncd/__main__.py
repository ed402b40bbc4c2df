from mailsyncd.cli import main

raise SystemExit(main())
