"""The mask file: writing it (writer: appends, the journal, resume by path, repair), the one
reader of a run folder (reader), and the output file's lock (lock)."""
