from aac_lightning.cli import main

main()
