from fish_lightning.report import main

if __name__ == "__main__":
    raise SystemExit(main())
