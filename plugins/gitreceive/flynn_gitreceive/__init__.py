"""gitreceive: `git push` over smart HTTP, and the receiver that builds and deploys a push."""
