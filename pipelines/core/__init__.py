"""What the stage scripts share: params, paths, jobs, results, tracking, Ray, console, goals and figures."""
