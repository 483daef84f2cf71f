"""The gateway's front doors: app routes and pages (`apps`), files for pages (`assets`), the open APIs
(`openai`, `spin`), the browser bridge (`bridge`) and the pool's socket (`pool`), assembled in `app`."""
