"""The tool runner of workflow steps: the job function of the workflow queue."""
