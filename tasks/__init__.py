"""SeqIO task registrations. Import a submodule (e.g. `tasks.glue`) to register its tasks."""
