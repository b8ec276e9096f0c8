"""``lungudrnet bench``: UDRNet and its peers on the same pairs, timed in child processes.

``data`` makes the pairs, ``peers`` holds one function per method, ``runner``
times a method in a child process, ``evaluate`` scores its field, ``tables``
writes results.md/csv and the TRE-vs-time figure, ``command`` is the CLI.
"""
