"""Model implementations the pipeline loads itself, where no maintained library class fits (see each module)."""
