"""The Dash dashboard over the results store, and the plotly figure builders it shares with the notebooks."""
