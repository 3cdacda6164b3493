"""Run one FISH experiment (same as the `fish-train` console command); see conf/train.yaml."""

from fish_lightning.app.launch import main

if __name__ == "__main__":
    main()
