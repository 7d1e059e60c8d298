"""The HTTP API's routes, one `APIRouter` per concern; each reaches the served engine through `state.AppState`."""
