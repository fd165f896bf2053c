from mtcore.cli import main

main()
