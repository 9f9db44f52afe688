"""``python -m setlist.dispatch``: one dispatcher replica (how `setlist up` runs it)."""

from setlist.dispatch.dispatcher import main

if __name__ == "__main__":
    main()
