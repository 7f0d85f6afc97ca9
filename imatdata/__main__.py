from imatdata.cli import main

main()
