"""`ppx-runtime play`: a recorded conversation through the full runtime, and its reports."""
