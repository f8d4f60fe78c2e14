/* examples/metrics.c — an instrumented loop served on /metrics with
 * libmicrohttpd (built only when libmicrohttpd-dev is installed).
 *
 * Runs a fake request loop in a thread, counting requests by route and
 * status and timing them in a histogram, and serves the registry on
 * http://127.0.0.1:PORT/metrics in the format the Accept header asks for.
 * With an argument (seconds) it serves that long; without, it fetches its
 * own /metrics once over loopback, prints the start of it and exits. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <keel/metrics.h>
#include <keel/pool.h>

static keel_metrics *registry;
static atomic_int stop;

static enum MHD_Result serve(void *cls, struct MHD_Connection *c, const char *url,
                             const char *method, const char *version, const char *upload,
                             size_t *upload_size, void **state)
{
    (void)cls;
    (void)version;
    (void)upload;
    (void)upload_size;
    (void)state;
    if (strcmp(method, "GET") != 0 || strcmp(url, "/metrics") != 0)
        return MHD_NO;
    keel_metrics_format f =
        keel_metrics_negotiate(MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Accept"));
    char *text;
    size_t len;
    if (keel_metrics_render_buf(registry, f, &text, &len) != 0)
        return MHD_NO;
    /* libmicrohttpd frees with free(); keel_free uses the same allocator
     * here, but copy to stay honest about who owns what */
    char *body = malloc(len ? len : 1);
    if (!body) {
        keel_free(text);
        return MHD_NO;
    }
    memcpy(body, text, len);
    keel_free(text);
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(r, "Content-Type", keel_metrics_content_type(f));
    enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ok;
}

static void *work(void *arg)
{
    (void)arg;
    keel_counter *requests;
    keel_histogram *latency;
    if (keel_metrics_counter(registry, "demo_requests_total", "Requests handled.",
                             (const char *[]){"route", "code"}, 2, &requests) != 0 ||
        keel_metrics_histogram(registry, "demo_request_duration_seconds", "Time to handle a request.",
                               (const char *[]){"route"}, 1, NULL, 0, &latency) != 0)
        return NULL;
    /* bind the children once; the loop touches no strings and no locks */
    keel_counter_child *ok = keel_counter_with(requests, "/items", "200");
    keel_counter_child *miss = keel_counter_with(requests, "/items", "404");
    keel_histogram_child *lat = keel_histogram_with(latency, "/items");
    if (!ok || !miss || !lat)
        return NULL;
    unsigned x = 1;
    for (long i = 0; !atomic_load(&stop); i++) {
        x = x * 1103515245u + 12345u;
        keel_counter_inc(x % 10 ? ok : miss);
        keel_histogram_observe(lat, (double)(x % 1000) / 4000.0);
        if (i % 1000 == 0)
            usleep(1000);
    }
    return NULL;
}

/* GET /metrics over loopback, as a scraper would. */
static void scrape(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        perror("socket");
        return;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        perror("connect");
        close(fd);
        return;
    }
    const char *req = "GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text\r\n\r\n";
    if (write(fd, req, strlen(req)) < 0) {
        close(fd);
        return;
    }
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n > 0) {
        buf[n] = '\0';
        char *end = buf;
        for (int lines = 0; lines < 24 && (end = strchr(end, '\n')); lines++)
            end++;
        if (end)
            *end = '\0';
        printf("%s...\n", buf);
    }
}

int main(int argc, char **argv)
{
    keel_metrics_opts mo = {0};
    if (keel_metrics_create(&registry, &mo) != 0)
        return 1;
    keel_pool *pool; /* a libkeel module reporting into the same registry */
    keel_pool_opts po = {.obj_size = 256, .metrics = registry, .metrics_name = "buffers"};
    if (keel_pool_create(&pool, &po) != 0) {
        keel_metrics_destroy(registry);
        return 1;
    }
    void *obj = keel_pool_acquire(pool);
    if (obj)
        keel_pool_release(pool, obj);

    struct MHD_Daemon *d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD, 0, NULL, NULL, serve,
                                            NULL, MHD_OPTION_SOCK_ADDR,
                                            &(struct sockaddr_in){.sin_family = AF_INET,
                                                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)},
                                            MHD_OPTION_END);
    if (!d) {
        fprintf(stderr, "cannot start the HTTP server\n");
        keel_pool_destroy(pool);
        keel_metrics_destroy(registry);
        return 1;
    }
    int port = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT)->port;
    pthread_t t;
    if (pthread_create(&t, NULL, work, NULL) != 0) {
        MHD_stop_daemon(d);
        keel_pool_destroy(pool);
        keel_metrics_destroy(registry);
        return 1;
    }
    if (argc > 1) {
        printf("serving http://127.0.0.1:%d/metrics for %s s\n", port, argv[1]);
        sleep((unsigned)atoi(argv[1]));
    } else {
        usleep(200000);
        printf("GET http://127.0.0.1:%d/metrics (Accept: OpenMetrics):\n", port);
        scrape(port);
    }
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    MHD_stop_daemon(d);
    keel_pool_destroy(pool);
    keel_metrics_destroy(registry);
    return 0;
}
