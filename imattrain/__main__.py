from imattrain.cli import main

main()
