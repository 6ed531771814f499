/* Test support: see README.md in this directory. */
